"""Continual evaluation: task streams, metrics, baseline methods, the stage x task protocol, reports.

Builds on the library (ContinualModel, experts, data); nothing in the library imports from here.
"""

from .cli import add_parser, cmd_bench

__all__ = ["add_parser", "cmd_bench"]
