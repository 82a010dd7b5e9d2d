"""``kvbm plan``: size kvbm's tiers from a trace of the user's own traffic.

The policy core (:mod:`kvbm.core`) is pure Python, so a recorded trace can be
replayed through the very planner, pools and filter that serve, at many tier
sizes, without a GPU: :mod:`~kvbm.tools.plan.trace` reads and writes traces,
:mod:`~kvbm.tools.plan.gpu` models vLLM's own prefix cache in front of kvbm,
:mod:`~kvbm.tools.plan.simulate` replays and sweeps, :mod:`~kvbm.tools.plan.report`
turns the results into a table, plots and settings.
"""
