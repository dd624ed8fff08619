// sha256.h — SHA-256 (FIPS 180-4) for cache keys and archive integrity checks.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace attnproto {

class Sha256 {
public:
    Sha256();
    void update(const void* data, size_t len);
    void update(const std::string& s) { update(s.data(), s.size()); }
    std::array<uint8_t, 32> digest();  // finalises; the object must not be updated afterwards
    static std::string hex(const std::array<uint8_t, 32>& d);
    static std::string hex_of(const std::string& s);

private:
    void block(const uint8_t* p);
    uint32_t h_[8];
    uint8_t buf_[64];
    size_t buf_len_ = 0;
    uint64_t total_ = 0;
};

}  // namespace attnproto
