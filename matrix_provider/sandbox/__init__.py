"""Tools run in a sandbox outside the agent process: a pool of sandboxed worker processes, one per
trajectory (lease), each holding a tool host's state for the whole conversation.

`spec` (config) and `host` (what a tool host implements) import nothing heavy; `pool` and `client`
need Ray only for their actor form.
"""
