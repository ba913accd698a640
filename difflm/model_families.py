"""The model families difflm knows, in one place that imports nothing (recipes read it without torch).

`difflm.models.load_model` implements them; recipes offer `FAMILY_CHOICES` ("auto" reads config.json).
"""

#: The families `load_model` knows; "ar" is the only non-diffusion one.
FAMILIES = ("llada", "dream", "mdlm", "mlm", "ar")

#: What a recipe's `model.family` may be: "auto" (detect from config.json) or one of FAMILIES.
FAMILY_CHOICES = ("auto", *FAMILIES)
