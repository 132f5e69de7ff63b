"""Test helpers shared by the suite (importable as `helpers.*`: tests/ is on sys.path, through conftest.py;
subprocess runs get it on PYTHONPATH)."""
