"""One module per technique. Importing this package registers every edit kind's replay function."""
