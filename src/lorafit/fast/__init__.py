"""Speed: device and precision, patches that remove work the classifier does not need, and the attention kernel.

Nothing here changes what a run computes beyond float rounding; every switch is a `speed.*` config key.
"""
