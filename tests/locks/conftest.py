from two_mounts import lockers, pair  # noqa: F401 - fixtures
