"""The critical alpha: curvature products (``curvature``), refinement of an adapter to a minimum (``refine``), the
generalised eigenproblem J x = lambda V x by Lanczos (``lanczos``) and the glue from a trained adapter and data
(``critical``). Imports the core and ``data``."""
