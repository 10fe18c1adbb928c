"""labelassist: ML backends for the annotation tools vision teams already use."""

__version__ = "0.1.0"
