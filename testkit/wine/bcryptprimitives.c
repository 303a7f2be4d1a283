/* Stands in for bcryptprimitives.dll, which Debian's Wine 8.0 lacks: Rust's standard library
 * for Windows draws its random bytes from ProcessPrng in that DLL. This forwards to
 * SystemFunction036 (RtlGenRandom, in advapi32), which Wine has. Test harness only: real
 * Windows ships the DLL. Built by testkit::wine with x86_64-w64-mingw32-gcc. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        /* RtlGenRandom takes a ULONG length. */
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
