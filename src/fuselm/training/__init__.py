"""Training what fusion uses, from task rows: the FusionRoute router (`fuselm train-router`).

Sits above evaluation (it reads tasks and judges sampled answers with their metrics) and above
fusion (it samples the experts' answers through the decoding loop).
"""
