import os

from hypothesis import HealthCheck, settings

# UNF_HYPOTHESIS=thorough runs many more random architectures (the slow CI stage uses it)
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("UNF_HYPOTHESIS", "default"))
