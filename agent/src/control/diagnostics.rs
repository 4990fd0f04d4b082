//! The diagnostics bundle behind `GET /v1/diagnostics`.
