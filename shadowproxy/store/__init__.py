"""The audit store: records of requests and their predictions, written off the event loop to
SQLite, with delayed labels joined to them.
"""
