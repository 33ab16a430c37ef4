"""Spatial-support analysis of a detector's nodes (sec. 2.1 and appendix A1 of the paper).

* :mod:`~dcnv2.analysis.nodes` — image-wise and RoI-wise nodes, models from checkpoints, prepared inputs;
* :mod:`~dcnv2.analysis.receptive_field` — effective receptive fields (gradient w.r.t. the pixels);
* :mod:`~dcnv2.analysis.sampling_locations` — effective sampling locations and bin locations;
* :mod:`~dcnv2.analysis.saliency` — error-bounded saliency regions;
* :mod:`~dcnv2.analysis.focus` — focus metrics over a data split;
* :mod:`~dcnv2.analysis.figures` — Fig. 1/2-style figures.
"""
from dcnv2.analysis.nodes import ImageNode, PreparedImage, RoINode, load_analysis_model, prepare_image, trunk_of
from dcnv2.analysis.receptive_field import ERF, effective_receptive_field, mass_inside
from dcnv2.analysis.saliency import SaliencyResult, saliency_region, slic_segments
from dcnv2.analysis.sampling_locations import (BinLocations, SamplingLocations, effective_bin_locations,
                                               effective_sampling_locations, stack_layers)

__all__ = ["ImageNode", "RoINode", "PreparedImage", "prepare_image", "load_analysis_model", "trunk_of", "ERF",
           "effective_receptive_field", "mass_inside", "SamplingLocations", "BinLocations",
           "effective_sampling_locations", "effective_bin_locations", "stack_layers", "SaliencyResult",
           "saliency_region", "slic_segments"]
