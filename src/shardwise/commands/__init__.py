"""The `shardwise` command line and its commands. The library never imports from here."""
