"""`python -m diffusion_ext ...`: see diffusion_ext.cli."""
from .cli import main

raise SystemExit(main())
