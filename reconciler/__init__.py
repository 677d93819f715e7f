"""reconciler: Terraform for door access. The version lives here, and only here (pyproject reads it)."""

__version__ = "0.2.0"
