"""The raptr-fx command line (installed as the package ``raptr_fx_cli``)."""

import warnings

# torch warns on import when NumPy is absent; raptr-fx never needs NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
