"""Self-Explore: first-pit exploration and step-level preference learning.

`steps` splits rationales, `explore` builds the data (RFT set, outcome pairs, first
pits, step pairs), `pipeline` runs the stages; `python -m jaxscore.self_explore` runs
them all.
"""
