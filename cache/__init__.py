"""Training-free speed-ups: feature caches (DeepCache, block caching) and attention-cost cutters
(ToDo, TGATE). Plain functions and small patch classes; the nodes live in nodes/cache.py."""
