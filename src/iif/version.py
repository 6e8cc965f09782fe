"""The package's version, on the ground floor: the run key and the pages record it, and the
command line prints it without importing anything else."""

__version__ = "0.2.0"
