"""The maths of RLHF as small pure functions: losses, advantages, KL estimators and controllers,
masked reductions, batch packing, evaluation metrics. Imports only torch and the standard
library; every formula is in its function's docstring and tested against hand-worked values.
"""
