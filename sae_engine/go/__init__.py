"""Gene Ontology enrichment of SAE features: ontology, annotations, all-features statistics."""
from .annotations import (AnnotationError, AnnotationMatrix, CountedWarnings, annotation_matrix, read_annotations,
                          read_gaf, read_pairs)
from .enrich import Enrichment, bh_log_q, enrich_features, hypergeom_log_sf, study_sets
from .ontology import NAMESPACES, Ontology, OntologyError, load_ontology, read_go_sqlite, read_obo

__all__ = [
    "NAMESPACES", "AnnotationError", "AnnotationMatrix", "CountedWarnings", "Enrichment", "Ontology", "OntologyError",
    "annotation_matrix", "bh_log_q", "enrich_features", "hypergeom_log_sf", "load_ontology", "read_annotations",
    "read_gaf", "read_go_sqlite", "read_obo", "read_pairs", "study_sets",
]
