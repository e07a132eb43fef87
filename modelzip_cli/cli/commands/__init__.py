"""One file per command: options, the config they build, the one library call it makes."""
