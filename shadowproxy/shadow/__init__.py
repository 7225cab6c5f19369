"""The shadow path: what the proxy does with each exchange, the mirror to the candidate, sampling,
the component seam and the metrics the hot path updates.
"""
