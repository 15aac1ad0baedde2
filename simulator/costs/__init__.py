"""Cost models: pure functions from an operation's shape and a hardware profile to seconds.

The event simulator and the planner's vectorised estimate call the same functions, so that
the two agree wherever no contention exists.
"""
