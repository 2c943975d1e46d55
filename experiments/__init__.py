"""The small-scale study of the paper's claims (`python -m experiments.study`)."""
