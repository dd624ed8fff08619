// params.h — host view of the shared parameter block and its layout table.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../shaders/common/attn_params.h"

namespace attnproto {

struct FieldLayout {
    std::string name;  // field name as in attn_params.h
    size_t offset;     // bytes from the start of AttentionParams
    size_t size;       // bytes (arrays: whole array)
};

// Every field of AttentionParams in declaration order; Python checks it against its dtype.
std::vector<FieldLayout> params_layout();

}  // namespace attnproto
