"""bitro.tl: train BiTro models, predict, save and load them.

torch and torch_geometric are imported inside the functions, not here.
"""

from bitro._checks import TrainingDivergedError
from bitro._deprecate import renamed_function
from bitro.tl._adapters import TransferredModel, load_adapters
from bitro.tl._baselines import add_baselines, color_statistics, reduced_rank_ridge
from bitro.tl._config import ModelConfig
from bitro.tl._contrastive import ImageAligner, align_images, load_image_aligner, spot_image_features
from bitro.tl._cross_validate import cross_validate
from bitro.tl._evaluate import evaluate
from bitro.tl._evaluate_cells import evaluate_cells
from bitro.tl._expression_encoder import (
    ExpressionEncoder,
    expression_encoder,
    integration_scores,
    load_expression_encoder,
    log1p_pca,
)
from bitro.tl._fit import fit
from bitro.tl._persist import BitroModel, bundled_models, load_model
from bitro.tl._predict import predict
from bitro.tl._pseudobulk import pseudobulk
from bitro.tl._regions import RegionClassifier, evaluate_regions, load_region_classifier, region_classifier
from bitro.tl._transfer import transfer

colour_statistics = renamed_function(color_statistics, "colour_statistics")

__all__ = [
    "BitroModel",
    "ExpressionEncoder",
    "ImageAligner",
    "ModelConfig",
    "RegionClassifier",
    "TrainingDivergedError",
    "TransferredModel",
    "add_baselines",
    "align_images",
    "bundled_models",
    "color_statistics",
    "colour_statistics",
    "cross_validate",
    "evaluate",
    "evaluate_cells",
    "evaluate_regions",
    "expression_encoder",
    "fit",
    "integration_scores",
    "load_adapters",
    "load_expression_encoder",
    "load_image_aligner",
    "load_model",
    "load_region_classifier",
    "log1p_pca",
    "predict",
    "pseudobulk",
    "reduced_rank_ridge",
    "region_classifier",
    "spot_image_features",
    "transfer",
]
