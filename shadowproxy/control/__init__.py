"""Control: assembling a proxy and running it (one process or workers), the admin app, readiness
and scrape-time metrics.
"""
