#include "archive.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "backend.h"
#include "sha256.h"

namespace attnproto {
namespace {
constexpr char kMagic[8] = {'A', 'P', 'A', 'R', 'C', 'H', '0', '1'};
constexpr size_t kHashBytes = 32;
// Upper bounds that reject absurd header fields from a damaged file before allocating.
constexpr uint32_t kMaxDescription = 1u << 20;
constexpr uint64_t kMaxPayload = uint64_t(1) << 31;

std::string errno_text() { return std::strerror(errno); }
}  // namespace

void make_dirs(const std::string& dir) {
    if (dir.empty()) return;
    std::string partial;
    std::stringstream ss(dir);
    std::string part;
    if (dir[0] == '/') partial = "/";
    while (std::getline(ss, part, '/')) {
        if (part.empty()) continue;
        partial += part + "/";
        if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
            throw BackendError("cannot create directory " + partial + ": " + errno_text());
    }
}

DiskArchive::DiskArchive(std::string dir) : dir_(std::move(dir)) { make_dirs(dir_); }

std::string DiskArchive::entry_path(const std::string& key_hex) const { return dir_ + "/" + key_hex + ".entry"; }

std::optional<std::vector<uint8_t>> DiskArchive::load(const std::string& key_hex, const std::string& description,
                                                      std::string* note) const {
    const std::string path = entry_path(key_hex);
    std::ifstream in(path, std::ios::binary);
    if (!in) return std::nullopt;
    auto corrupt = [&](const std::string& why) -> std::optional<std::vector<uint8_t>> {
        in.close();
        ::unlink(path.c_str());
        if (note) *note = "archive entry " + path + " rejected (" + why + ") and removed";
        return std::nullopt;
    };
    char magic[8];
    if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 8) != 0) return corrupt("bad magic");
    uint32_t dlen = 0;
    if (!in.read(reinterpret_cast<char*>(&dlen), 4) || dlen > kMaxDescription) return corrupt("bad header");
    std::string desc(dlen, '\0');
    if (!in.read(desc.data(), dlen)) return corrupt("truncated header");
    if (desc != description) return corrupt("description mismatch");
    uint64_t plen = 0;
    if (!in.read(reinterpret_cast<char*>(&plen), 8) || plen > kMaxPayload) return corrupt("bad payload length");
    uint8_t want[kHashBytes];
    if (!in.read(reinterpret_cast<char*>(want), kHashBytes)) return corrupt("truncated hash");
    std::vector<uint8_t> payload(plen);
    if (plen && !in.read(reinterpret_cast<char*>(payload.data()), std::streamsize(plen))) return corrupt("truncated payload");
    if (in.peek() != std::char_traits<char>::eof()) return corrupt("trailing bytes");
    Sha256 h;
    h.update(payload.data(), payload.size());
    auto got = h.digest();
    if (std::memcmp(got.data(), want, kHashBytes) != 0) return corrupt("payload hash mismatch");
    return payload;
}

void DiskArchive::store(const std::string& key_hex, const std::string& description,
                        const std::vector<uint8_t>& payload) const {
    const std::string path = entry_path(key_hex);
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    Sha256 h;
    h.update(payload.data(), payload.size());
    auto digest = h.digest();
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) throw BackendError("cannot write archive entry " + tmp + ": " + errno_text());
        uint32_t dlen = uint32_t(description.size());
        uint64_t plen = payload.size();
        out.write(kMagic, 8);
        out.write(reinterpret_cast<const char*>(&dlen), 4);
        out.write(description.data(), dlen);
        out.write(reinterpret_cast<const char*>(&plen), 8);
        out.write(reinterpret_cast<const char*>(digest.data()), kHashBytes);
        out.write(reinterpret_cast<const char*>(payload.data()), std::streamsize(plen));
        out.flush();
        if (!out) {
            ::unlink(tmp.c_str());
            throw BackendError("short write to archive entry " + tmp);
        }
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        std::string why = errno_text();
        ::unlink(tmp.c_str());
        throw BackendError("cannot move archive entry into place " + path + ": " + why);
    }
}

DiskArchive::Lock::Lock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw BackendError("cannot open lock file " + path + ": " + errno_text());
    while (::flock(fd_, LOCK_EX) != 0) {
        if (errno != EINTR) {
            std::string why = errno_text();
            ::close(fd_);
            fd_ = -1;
            throw BackendError("cannot lock " + path + ": " + why);
        }
    }
}

DiskArchive::Lock& DiskArchive::Lock::operator=(Lock&& o) noexcept {
    if (this != &o) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = o.fd_;
        o.fd_ = -1;
    }
    return *this;
}

DiskArchive::Lock::~Lock() {
    if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

DiskArchive::Lock DiskArchive::lock(const std::string& key_hex) const { return Lock(dir_ + "/" + key_hex + ".lock"); }

}  // namespace attnproto
