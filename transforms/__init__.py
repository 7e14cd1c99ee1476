"""The stages of gbif-embed, one module each, in the order data flows."""
