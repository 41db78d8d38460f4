"""Gene-set libraries bundled with ctrace (GMT files under `ctrace/data/genesets/`).

Hallmark (MSigDB v7.4, CC BY 4.0), Reactome pathways (CC0) and Enrichr's GO Biological Process 2021
(GO annotations, CC BY 4.0). Sources, licences and citations: `data/genesets/ATTRIBUTION.md`.
KEGG and TRRUST are deliberately not bundled (redistribution restricted / licence unsettled).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ctrace.errors import CtraceInputError

BUNDLED_GMT_FILES: dict[str, str] = {
    "hallmark": "h.all.v7.4.symbols.gmt",
    "reactome": "ReactomePathways.gmt",
    "go_bp": "enrichr.GO_Biological_Process_2021.gmt",
}


def bundled_gmt_paths() -> dict[str, Path]:
    """Library name → path of its bundled GMT file (`hallmark`, `reactome`, `go_bp`)."""
    folder = resources.files("ctrace") / "data" / "genesets"
    paths = {}
    for name, filename in BUNDLED_GMT_FILES.items():
        path = Path(str(folder / filename))
        if not path.is_file():
            raise FileNotFoundError(f"bundled gene-set file missing from the installation: {path}")
        paths[name] = path
    return paths


def load_libraries(entries) -> dict[str, dict[str, frozenset[str]]]:
    """Library name → {term → genes} for config entries: bundled names, or GMT paths (named by file stem)."""
    from ctrace.enrichment import read_gmt

    bundled = bundled_gmt_paths()
    return {name: read_gmt(bundled.get(entry, Path(entry))) for name, entry in library_names(entries).items()}


def library_names(entries) -> dict[str, str]:
    """Library name → gene_sets entry: a bundled library goes by its own name, a GMT file by its stem;
    two entries of one name are an error."""
    names: dict[str, str] = {}
    for entry in entries:
        name = entry if entry in BUNDLED_GMT_FILES else Path(entry).stem
        if name in names:
            raise CtraceInputError(
                f"annotation.gene_sets: {names[name]!r} and {entry!r} are both library {name!r} (a GMT file is "
                "named by its file stem); rename one of the files"
            )
        names[name] = entry
    return names
