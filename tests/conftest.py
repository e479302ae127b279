"""Test-suite setup: ``tests/`` on sys.path (for ``from helpers import ...``) and hypothesis profiles.

Profiles (choose with the environment variable HYPOTHESIS_PROFILE):
- ``default``: random search, examples as each test sets them, no per-example deadline.
- ``ci``: the same examples on every run (derandomised, no example database), for reproducible CI.
Longer searches: THL_HYPOTHESIS_SCALE=N multiplies every test's example count (see helpers.examples).
"""
import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", deadline=None, suppress_health_check=_QUIET)
settings.register_profile("ci", deadline=None, suppress_health_check=_QUIET, derandomize=True, database=None,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
