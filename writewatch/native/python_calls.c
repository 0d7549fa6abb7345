/*
 * python_calls.c: GetWriteWatch's per-frame call as one CPython function.
 *
 * A game calls GetWriteWatch once a frame, often over a few pages, where the
 * call's fixed cost is most of its cost. Made of cffi calls, it pays for
 * from_buffer, the conversion of five arguments and a Python frame of checks:
 * on a 16-page region more than the scan itself. This function takes the
 * numpy array through the buffer protocol and calls the native index
 * (index_calls.c) directly, with the GIL released around it as cffi would.
 *
 * It decides nothing the index does not. It only recognises the common call
 * (integers, an exact numpy array that is 1-D, C-contiguous, writable and of
 * native 64-bit unsigned integers, a count that fits it) and answers None for
 * anything else; watch.py then takes that call through its checked path,
 * where every refusal is worded. A result it does return is the index's:
 * a count, or a negative verdict that watch.py decodes (index.verdict).
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

/* The array's own format for native 64-bit unsigned integers: numpy's uintp
 * and uint64 are "L", its ulonglong "Q" (the same dtype to numpy). */
static int is_native_uint64(const char *format)
{
    return format != NULL && (strcmp(format, "L") == 0 || strcmp(format, "Q") == 0);
}

/* get_write_watch(flags, base, size, addresses, count): the index's result,
 * or None where the call is not the common one. */
static PyObject *get_write_watch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    uint64_t flags, base, size, capacity = 0;
    if (nargs != 5 || !as_uint64(args[0], &flags) || !as_uint64(args[1], &base) ||
        !as_uint64(args[2], &size) || (PyObject *)Py_TYPE(args[3]) != ndarray_type ||
        (args[4] != Py_None && !as_uint64(args[4], &capacity)))
        Py_RETURN_NONE;
    ww_buffer view;
    if (PyObject_GetBuffer(args[3], &view,
                           PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    uint64_t length = view.ndim == 1 ? (uint64_t)view.shape[0] : 0;
    if (args[4] == Py_None)
        capacity = length;
    if (view.ndim != 1 || view.itemsize != 8 || !is_native_uint64(view.format) ||
        capacity == 0 || capacity > length) {
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

static PyMethodDef get_write_watch_def = {
    "get_write_watch", (PyCFunction)(void (*)(void))get_write_watch, METH_FASTCALL,
    "get_write_watch(flags, base, size, addresses, count): GetWriteWatch's common call "
    "on the native index, or None for any other call.",
};

/* Called through cffi, which released the GIL: take it, and set
 * writewatch._native.get_write_watch. 0, or -1 with nothing set. */
int ww_install_python_calls(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int result = -1;
    PyObject *module = PyImport_ImportModule("writewatch._native");
    PyObject *numpy = module ? PyImport_ImportModule("numpy") : NULL;
    PyObject *ndarray = numpy ? PyObject_GetAttrString(numpy, "ndarray") : NULL;
    PyObject *function = ndarray ? PyCFunction_NewEx(&get_write_watch_def, NULL, NULL) : NULL;
    if (function && PyObject_SetAttrString(module, "get_write_watch", function) == 0) {
        Py_XDECREF(ndarray_type);
        ndarray_type = ndarray;
        ndarray = NULL;
        result = 0;
    }
    if (result != 0)
        PyErr_Clear();
    Py_XDECREF(function);
    Py_XDECREF(ndarray);
    Py_XDECREF(numpy);
    Py_XDECREF(module);
    PyGILState_Release(gil);
    return result;
}
