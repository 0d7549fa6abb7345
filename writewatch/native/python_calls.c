/*
 * python_calls.c: the per-frame calls as CPython functions: GetWriteWatch's
 * common call and the calling process's process_memwatch.
 *
 * A game calls GetWriteWatch once a frame, and an incremental GC or a
 * checkpointer calls process_memwatch as often, often over a few pages, where
 * a call's fixed cost is most of its cost. Made of cffi calls, each paid for
 * from_buffer, the conversion of every argument and a Python frame of checks:
 * on 16 pages more than the scan itself. These functions take the numpy array
 * through the buffer protocol and make the native call (index_calls.c,
 * memwatch.c) directly, with the GIL released around it as cffi would. Even
 * a 16-page call releases it, though that costs about a tenth of the call:
 * the store into the output array may fault into memory a Python thread
 * serves (userfaultfd missing pages), which needs the GIL to answer.
 *
 * They decide nothing the native calls do not. Each only recognises its
 * common call (integers, an exact numpy array that is 1-D, C-contiguous,
 * writable and of native 64-bit integers, a count that fits it) and answers
 * None for anything else; watch.py and memwatch.py then take that call
 * through their checked paths, where every refusal is worded. A result they
 * do return is the native call's: a count, or a negative verdict that the
 * Python side decodes as it decodes the cffi call's.
 *
 * One abi3 extension serves Python 3.10 to 3.13, so this is built against
 * the stable ABI of 3.10. Python 3.11 added the buffer protocol to the
 * stable ABI as it had been since 3.0 (the same Py_buffer layout, the same
 * two functions), so where the headers keep it out of 3.10's stable ABI it is
 * declared here.
 */
#define Py_LIMITED_API 0x030a0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"

#ifdef PyBUF_WRITABLE
typedef Py_buffer ww_buffer;
#else
typedef struct {
    void *buf;
    PyObject *obj;
    Py_ssize_t len;
    Py_ssize_t itemsize;
    int readonly;
    int ndim;
    char *format;
    Py_ssize_t *shape;
    Py_ssize_t *strides;
    Py_ssize_t *suboffsets;
    void *internal;
} ww_buffer;
#define PyBUF_WRITABLE 0x0001
#define PyBUF_FORMAT 0x0004
#define PyBUF_ND 0x0008
#define PyBUF_STRIDES (0x0010 | PyBUF_ND)
#define PyBUF_C_CONTIGUOUS (0x0020 | PyBUF_STRIDES)
PyAPI_FUNC(int) PyObject_GetBuffer(PyObject *obj, ww_buffer *view, int flags);
PyAPI_FUNC(void) PyBuffer_Release(ww_buffer *view);
#endif

static PyObject *ndarray_type; /* numpy.ndarray: only its exact instances are taken */

/* An int (bool and IntFlag included, as the checked path takes them) in
 * 0..2**64-1; 0 for anything else, with no exception left set. */
static int as_uint64(PyObject *value, uint64_t *out)
{
    if (!PyLong_Check(value))
        return 0;
    unsigned long long number = PyLong_AsUnsignedLongLong(value);
    if (number == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = number;
    return 1;
}

/* A signed 64-bit int; 0 for anything else, with no exception left set. */
static int as_int64(PyObject *value, int64_t *out)
{
    if (!PyLong_Check(value))
        return 0;
    long long number = PyLong_AsLongLong(value);
    if (number == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = number;
    return 1;
}

/* Take an exact numpy array that is 1-D, C-contiguous, writable and of
 * native 64-bit integers, unsigned or signed as asked (numpy's buffer format
 * is "L" for uintp and uint64, "Q" for ulonglong, "l" and "q" for the signed
 * ones: the same dtypes to numpy). 1 with *view held (PyBuffer_Release), or 0
 * with nothing held and no exception set. */
static int take_array(PyObject *array, int is_signed, ww_buffer *view, uint64_t *length)
{
    if ((PyObject *)Py_TYPE(array) != ndarray_type)
        return 0;
    if (PyObject_GetBuffer(array, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS)) {
        PyErr_Clear();
        return 0;
    }
    const char *format = view->format ? view->format : "";
    int native = is_signed ? strcmp(format, "l") == 0 || strcmp(format, "q") == 0
                           : strcmp(format, "L") == 0 || strcmp(format, "Q") == 0;
    if (view->ndim != 1 || view->itemsize != 8 || !native) {
        PyBuffer_Release(view);
        return 0;
    }
    *length = (uint64_t)view->shape[0];
    return 1;
}

/* get_write_watch(flags, base, size, addresses, count): the index's result,
 * or None where the call is not the common one. */
static PyObject *get_write_watch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    uint64_t flags, base, size, capacity = 0, length;
    ww_buffer view;
    if (nargs != 5 || !as_uint64(args[0], &flags) || !as_uint64(args[1], &base) ||
        !as_uint64(args[2], &size) || (args[4] != Py_None && !as_uint64(args[4], &capacity)))
        Py_RETURN_NONE;
    if (!take_array(args[3], 0, &view, &length))
        Py_RETURN_NONE;
    if (args[4] == Py_None)
        capacity = length;
    if (capacity == 0 || capacity > length) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    int64_t found;
    Py_BEGIN_ALLOW_THREADS
    found = ww_index_get_write_watch(flags, base, size, view.buf, capacity);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(found);
}

/* process_memwatch(kind, uffd, pagemap_fd, start, length, flags, vec): the
 * calling process's process_memwatch on the selected backend's handle
 * (memwatch.py's _selection), with vec_len = len(vec): ww_memwatch_call's
 * result, or None where the call is not the common one. vec is read only
 * with MEMWATCH_SD_GET, as the proposal reads it. */
static PyObject *process_memwatch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    int64_t kind, uffd, pagemap_fd, length;
    uint64_t start, flags, capacity = 0;
    ww_buffer view;
    int has_vec = 0;
    if (nargs != 7 || !as_int64(args[0], &kind) || !as_int64(args[1], &uffd) ||
        !as_int64(args[2], &pagemap_fd) || !as_uint64(args[3], &start) ||
        !as_int64(args[4], &length) || !as_uint64(args[5], &flags) || flags > UINT32_MAX ||
        kind < INT32_MIN || kind > INT32_MAX)
        Py_RETURN_NONE;
    if (flags & MEMWATCH_SD_GET) {
        if (!take_array(args[6], 1, &view, &capacity))
            Py_RETURN_NONE;
        has_vec = 1;
    }
    int64_t result;
    Py_BEGIN_ALLOW_THREADS
    result = ww_memwatch_call((int)kind, uffd, pagemap_fd, start, length, (unsigned)flags,
                              (int64_t)capacity, has_vec ? view.buf : NULL, NULL);
    Py_END_ALLOW_THREADS
    if (has_vec)
        PyBuffer_Release(&view);
    return PyLong_FromLongLong(result);
}

static PyMethodDef functions[] = {
    {"get_write_watch", (PyCFunction)(void (*)(void))get_write_watch, METH_FASTCALL,
     "get_write_watch(flags, base, size, addresses, count): GetWriteWatch's common call "
     "on the native index, or None for any other call."},
    {"process_memwatch", (PyCFunction)(void (*)(void))process_memwatch, METH_FASTCALL,
     "process_memwatch(kind, uffd, pagemap_fd, start, length, flags, vec): the calling "
     "process's common process_memwatch call, or None for any other call."},
};

/* Called through cffi, which released the GIL: take it, and set the
 * functions above as attributes of writewatch._native. 0, or -1 with nothing
 * set. */
int ww_install_python_calls(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int result = -1;
    PyObject *module = PyImport_ImportModule("writewatch._native");
    PyObject *numpy = module ? PyImport_ImportModule("numpy") : NULL;
    PyObject *ndarray = numpy ? PyObject_GetAttrString(numpy, "ndarray") : NULL;
    if (ndarray) {
        result = 0;
        for (size_t i = 0; result == 0 && i < sizeof functions / sizeof *functions; i++) {
            PyObject *function = PyCFunction_NewEx(&functions[i], NULL, NULL);
            if (!function || PyObject_SetAttrString(module, functions[i].ml_name, function))
                result = -1;
            Py_XDECREF(function);
        }
    }
    if (result == 0) {
        Py_XDECREF(ndarray_type);
        ndarray_type = ndarray;
        ndarray = NULL;
    } else {
        PyErr_Clear();
    }
    Py_XDECREF(ndarray);
    Py_XDECREF(numpy);
    Py_XDECREF(module);
    PyGILState_Release(gil);
    return result;
}
