// Status propagation macros used by all host code (VQKV_RETURN_IF_ERROR, VQKV_ASSIGN_OR_RETURN).
// Thread-safety: macros only; no state.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define VQKV_CONCAT_INNER_(a, b) a##b
#define VQKV_CONCAT_(a, b) VQKV_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if not OK.
#define VQKV_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status vqkv_status_ = (expr);        \
    if (!vqkv_status_.ok()) return vqkv_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, else moves the value
// into `lhs` (which may be a declaration such as `auto x`).
#define VQKV_ASSIGN_OR_RETURN(lhs, rexpr) \
  VQKV_ASSIGN_OR_RETURN_IMPL_(VQKV_CONCAT_(vqkv_statusor_, __LINE__), lhs, rexpr)

#define VQKV_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)  \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
