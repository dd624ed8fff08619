// kernel_key.h — the only place kernel names and cache keys come from.
//
// A KernelKey is a kernel name plus named integer constants (HEAD_DIM=128,
// BLOCK_R=64, ...). On CUDA the constants become -D definitions for NVRTC; on
// Metal they become MTLFunctionConstantValues (by name). The in-memory cache
// key is canonical(); the on-disk archive key additionally covers the source
// hash, the target arch and the compiler version (see archive_key()).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace attnproto {

struct KernelKey {
    std::string name;                          // kernel entry point == source file stem
    std::map<std::string, int64_t> constants;  // named specialisation constants, sorted by name

    KernelKey() = default;
    KernelKey(std::string n, std::map<std::string, int64_t> c = {});

    // "name[A=1,B=2]" — stable, sorted, used as the in-memory cache key and in messages.
    std::string canonical() const;

    // Hex SHA-256 of canonical() + source hash + arch + compiler version + options.
    std::string archive_key(const std::string& source_hash, const std::string& arch,
                            const std::string& compiler_version,
                            const std::string& options = "") const;

    bool operator==(const KernelKey& o) const { return name == o.name && constants == o.constants; }
    bool operator<(const KernelKey& o) const { return canonical() < o.canonical(); }
};

// Validates a kernel or constant name: [A-Za-z_][A-Za-z0-9_]*; throws std::invalid_argument.
void validate_identifier(const std::string& what, const std::string& s);

}  // namespace attnproto
