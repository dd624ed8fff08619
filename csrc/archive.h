// archive.h — on-disk binary archive of compiled kernels (the CUDA analogue of
// MTLBinaryArchive). One file per entry, named by the entry's archive key.
//
// Entry file: "APARCH01" | u32 description length | description | u64 payload
// length | SHA-256 of payload (32 bytes) | payload. The description (canonical
// KernelKey, arch, compiler) must match on load and the payload hash must
// verify; otherwise the entry is removed and reported as corrupt, and the
// caller rebuilds it. Writes go to a temporary file in the same directory and
// are renamed into place (atomic on POSIX) while holding an exclusive flock on
// the entry's lock file, so concurrent processes never read half an entry and
// never compile the same entry twice at once.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace attnproto {

class DiskArchive {
public:
    explicit DiskArchive(std::string dir);

    const std::string& dir() const { return dir_; }
    std::string entry_path(const std::string& key_hex) const;

    // Payload of a valid entry; nullopt if absent or corrupt (then *note says why and the
    // corrupt file has been removed).
    std::optional<std::vector<uint8_t>> load(const std::string& key_hex, const std::string& description,
                                             std::string* note) const;
    // Atomically writes an entry (caller should hold lock(key_hex)).
    void store(const std::string& key_hex, const std::string& description,
               const std::vector<uint8_t>& payload) const;

    // RAII exclusive lock on one entry (flock on "<key>.lock").
    class Lock {
    public:
        Lock() = default;
        explicit Lock(const std::string& path);
        Lock(Lock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
        Lock& operator=(Lock&& o) noexcept;
        ~Lock();
        Lock(const Lock&) = delete;
        Lock& operator=(const Lock&) = delete;

    private:
        int fd_ = -1;
    };
    Lock lock(const std::string& key_hex) const;

private:
    std::string dir_;
};

// mkdir -p; throws BackendError on failure.
void make_dirs(const std::string& dir);

}  // namespace attnproto
