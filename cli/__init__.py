"""The raptr-fx command line (installed as the package ``raptr_fx_cli``)."""
