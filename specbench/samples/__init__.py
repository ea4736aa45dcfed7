"""Sample data shipped with specbench (synthetic, not PubMedQA)."""
