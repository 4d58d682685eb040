"""Named model configurations of the papers (installed as ``larq_landmarks.named_models``).

Each ``<name>.json`` holds the arguments of ``larq_landmarks.models.BinaryHourglass`` for one of
the networks the papers compare; build one with ``larq_landmarks.models.build_named(name, K)``.
"""
