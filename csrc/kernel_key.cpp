#include "kernel_key.h"

#include <stdexcept>

#include "sha256.h"

namespace attnproto {

void validate_identifier(const std::string& what, const std::string& s) {
    auto alpha = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; };
    auto digit = [](char c) { return c >= '0' && c <= '9'; };
    bool ok = !s.empty() && alpha(s[0]);
    for (char c : s) ok = ok && (alpha(c) || digit(c));
    if (!ok) throw std::invalid_argument(what + ": '" + s + "' is not an identifier ([A-Za-z_][A-Za-z0-9_]*)");
}

KernelKey::KernelKey(std::string n, std::map<std::string, int64_t> c) : name(std::move(n)), constants(std::move(c)) {
    validate_identifier("kernel name", name);
    for (auto& kv : constants) validate_identifier("constant name of kernel " + name, kv.first);
}

std::string KernelKey::canonical() const {
    std::string s = name + "[";
    bool first = true;
    for (auto& kv : constants) {
        if (!first) s += ",";
        s += kv.first + "=" + std::to_string(kv.second);
        first = false;
    }
    return s + "]";
}

std::string KernelKey::archive_key(const std::string& source_hash, const std::string& arch,
                                   const std::string& compiler_version, const std::string& options) const {
    // Fields are length-prefixed so that no two distinct tuples hash the same text.
    std::string text;
    for (const std::string* f : {&name, &source_hash, &arch, &compiler_version, &options}) {
        text += std::to_string(f->size()) + ":" + *f + ";";
    }
    std::string c = canonical();
    text += std::to_string(c.size()) + ":" + c + ";";
    return Sha256::hex_of(text);
}

}  // namespace attnproto
