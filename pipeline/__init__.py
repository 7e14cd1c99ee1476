"""gbif-embed's launcher: options, the graph and the command line."""
