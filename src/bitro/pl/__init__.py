"""bitro.pl: expression on the tissue, phenotypes, tissue regions, evaluation metrics, training curves."""

from bitro.pl._expression import expression
from bitro.pl._metrics import metrics
from bitro.pl._phenotypes import phenotypes
from bitro.pl._regions import regions
from bitro.pl._training import training

__all__ = ["expression", "metrics", "phenotypes", "regions", "training"]
