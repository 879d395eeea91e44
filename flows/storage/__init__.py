"""The pipeline's own database (SQLite or Postgres through SQLAlchemy, Alembic migrations): the
ledger of landed files and leases, and every line's carried state, read for a whole file in
one query and written back with everything the file produced in one transaction."""
