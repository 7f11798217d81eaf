"""Adaptive tensor parallelism: estimate the fabric's links from the collectives training already runs, and
re-plan the layout when another one is predicted (and then measured) to be faster.

    LinkEstimator / LinkEstimate   bandwidth.py: windowed lower envelope of collective times -> alpha-beta per
                                   link class, with its uncertainty; agree() makes every rank's numbers equal
    Replanner / Decision           replanner.py: cost model v2 at the live estimates, switch cost, margin,
                                   patience, cool-down, switch-back on measurement; every decision a JSON-able dict
"""

from .bandwidth import CLASSES, LinkEstimate, LinkEstimator, reference_link
from .replanner import Decision, Replanner, live_hardware, model_switch_cost

__all__ = ["CLASSES", "Decision", "LinkEstimate", "LinkEstimator", "Replanner", "live_hardware",
           "model_switch_cost", "reference_link"]  # fmt: skip
