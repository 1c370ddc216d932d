"""One module per `ckptd` command that does more than print."""
