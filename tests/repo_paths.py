"""Paths every test may need, wherever its file sits under tests/."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The repository.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")  # Golden fixtures (make_reference_fixtures.py).
