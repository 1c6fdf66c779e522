"""One job from data to a served model: prepare -> train -> compress -> evaluate -> deploy -> smoke."""
