/* The part of <windows.h> that write-watch code uses, for Linux x86_64.
 *
 * C code written for Windows includes this instead of the SDK's header and
 * links against libwinshim.so, which implements the memory functions on
 * writewatch. The types have Windows' sizes (DWORD and ULONG are 32-bit,
 * ULONG_PTR and SIZE_T pointer-sized); WINAPI is the native calling
 * convention, since both sides are Linux code.
 */
#ifndef WINSHIM_WINDOWS_H
#define WINSHIM_WINDOWS_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define WINAPI

typedef int BOOL;
typedef unsigned char BYTE;
typedef uint16_t WORD;
typedef uint32_t DWORD;
typedef int32_t LONG;
typedef int64_t LONGLONG;
typedef unsigned int UINT;
typedef uint32_t ULONG;
typedef uintptr_t ULONG_PTR;
typedef uintptr_t DWORD_PTR;
typedef size_t SIZE_T;
typedef void *PVOID;
typedef void *LPVOID;
typedef DWORD *PDWORD;
typedef const void *LPCVOID;

#define TRUE 1
#define FALSE 0

#define MEM_COMMIT 0x00001000
#define MEM_RESERVE 0x00002000
#define MEM_DECOMMIT 0x00004000
#define MEM_RELEASE 0x00008000
#define MEM_WRITE_WATCH 0x00200000

#define PAGE_NOACCESS 0x01
#define PAGE_READONLY 0x02
#define PAGE_READWRITE 0x04

#define WRITE_WATCH_FLAG_RESET 0x01

#define MEM_FREE 0x00010000
#define MEM_PRIVATE 0x00020000

#define ERROR_SUCCESS 0
#define ERROR_INVALID_HANDLE 6
#define ERROR_HANDLE_EOF 38
#define ERROR_IO_PENDING 997
#define ERROR_NOT_ENOUGH_MEMORY 8
#define ERROR_NOT_SUPPORTED 50
#define ERROR_INVALID_PARAMETER 87
#define ERROR_INVALID_ADDRESS 487
#define ERROR_NOACCESS 998

typedef struct {
    PVOID BaseAddress;
    PVOID AllocationBase;
    DWORD AllocationProtect;
    uint16_t PartitionId;
    SIZE_T RegionSize;
    DWORD State;
    DWORD Protect;
    DWORD Type;
} MEMORY_BASIC_INFORMATION, *PMEMORY_BASIC_INFORMATION;

typedef void *HANDLE;
typedef struct {
    ULONG_PTR Internal; /* the status: STATUS_PENDING until the read completes */
    ULONG_PTR InternalHigh; /* the bytes transferred */
    DWORD Offset;
    DWORD OffsetHigh;
    HANDLE hEvent;
} OVERLAPPED, *LPOVERLAPPED;
#define STATUS_PENDING 0x103

/* Implemented by libwinshim.so (writewatch underneath). */
LPVOID WINAPI VirtualAlloc(LPVOID address, SIZE_T size, DWORD allocation_type, DWORD protect);
BOOL WINAPI VirtualFree(LPVOID address, SIZE_T size, DWORD free_type);
BOOL WINAPI VirtualProtect(LPVOID address, SIZE_T size, DWORD new_protect, PDWORD old_protect);
UINT WINAPI GetWriteWatch(DWORD flags, PVOID base, SIZE_T size, PVOID *addresses,
                          ULONG_PTR *count, ULONG *granularity);
UINT WINAPI ResetWriteWatch(LPVOID base, SIZE_T size);
SIZE_T WINAPI VirtualQuery(LPCVOID address, PMEMORY_BASIC_INFORMATION info, SIZE_T length);
DWORD WINAPI GetLastError(void);
void WINAPI SetLastError(DWORD code);

/* Not Windows: call before the kernel writes into watched memory (read(2),
 * recv(2) into a VirtualAlloc buffer). A layer calls it inside its own ReadFile
 * over the whole buffer, once the handle is known to be valid: it marks every
 * page written, as Windows does however many bytes arrive, and makes the pages
 * writable for the kernel (with the mprotect backend armed pages are read-only
 * and the kernel's write would fail with EFAULT). A reset between this call and
 * the kernel's write re-arms the pages: call it again. */
void WINAPI PrepareKernelWrite(PVOID address, SIZE_T size);

/* Small helpers Windows programs take for granted, done with POSIX here. */
typedef union {
    struct {
        DWORD LowPart;
        LONG HighPart;
    } u;
    LONGLONG QuadPart;
} LARGE_INTEGER;

static inline BOOL QueryPerformanceFrequency(LARGE_INTEGER *frequency)
{
    frequency->QuadPart = 1000000000LL;
    return TRUE;
}

static inline BOOL QueryPerformanceCounter(LARGE_INTEGER *counter)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    counter->QuadPart = (LONGLONG)now.tv_sec * 1000000000LL + now.tv_nsec;
    return TRUE;
}

typedef struct {
    WORD wProcessorArchitecture;
    WORD wReserved;
    DWORD dwPageSize;
    LPVOID lpMinimumApplicationAddress;
    LPVOID lpMaximumApplicationAddress;
    DWORD_PTR dwActiveProcessorMask;
    DWORD dwNumberOfProcessors;
    DWORD dwProcessorType;
    DWORD dwAllocationGranularity;
    WORD wProcessorLevel;
    WORD wProcessorRevision;
} SYSTEM_INFO;

static inline void GetSystemInfo(SYSTEM_INFO *info)
{
    long processors = sysconf(_SC_NPROCESSORS_ONLN);
    *info = (SYSTEM_INFO){0};
    info->wProcessorArchitecture = 9; /* PROCESSOR_ARCHITECTURE_AMD64 */
    info->dwPageSize = (DWORD)sysconf(_SC_PAGESIZE);
    info->lpMinimumApplicationAddress = (LPVOID)0x10000;
    info->lpMaximumApplicationAddress = (LPVOID)0x7FFFFFFEFFFFULL;
    info->dwNumberOfProcessors = processors > 0 ? (DWORD)processors : 1;
    info->dwAllocationGranularity = 0x10000;
}

#endif /* WINSHIM_WINDOWS_H */
