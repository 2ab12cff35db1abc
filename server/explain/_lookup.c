/* Subset-table TreeSHAP lookup, compiled (server/explain/compiled.py wraps it).
 *
 * The arithmetic of server/explain/subsets.py, per row and in path order. A path's
 * players' interval tests give its satisfied mask A; a failed player gets -K(A), a
 * satisfied one (1 - z) / z * K(A \ {i}) = (1/z - 1) * K(A ^ bit). Per row:
 *   1. every cell's test, one flat branch-free pass (one byte per cell);
 *   2. per block of paths, each path's mask from its cells' bytes (one SSE2 movemask:
 *      a path's cells are contiguous, at most 16), and the table entries the block
 *      will read prefetched, so a table gone cold since the last explanation is read
 *      with its misses overlapped rather than one by one;
 *   3. the block's lookups, branch-free (a failed player reads K(A), times -1).
 *
 * The tables are kept as float32 (copied from the float64 ones the numpy engine uses):
 * a cold row's cost is its scattered table reads, and half the bytes means fewer cache
 * lines and a table that stays in the cache longer (bench/RESULTS.md: ~15-20% per row).
 * Each weight is rounded once (relative 6e-8); attributions are summed in float64, so
 * they agree with the numpy engine to ~1e-7, inside the float32 tolerance the margin
 * check at load allows (server/explain/explainer.py).
 *
 * A Kernel copies and checks its arrays once, when built (it owns them: nothing can
 * change them afterwards), so add_to only checks the shapes of the row and output
 * buffers. Plain CPython API and the buffer protocol (no numpy headers); the GIL is
 * released while rows are explained.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_DEPTH 16
#define BLOCK 16
#define PAD 16 /* bytes past the last cell a movemask may read */
#define HUGE_PAGE ((size_t)2 << 20)

typedef struct {
    PyObject_HEAD
    Py_ssize_t features, paths, cells;
    int32_t *start;   /* [paths + 1] first cell of each path */
    int32_t *feature; /* [cells] */
    float *lo, *hi;   /* [cells] the player's interval */
    uint8_t *nan_ok;  /* [cells] a NaN satisfies the player */
    double *scale;    /* [cells] 1 / z */
    int64_t *offset;  /* [paths] start of each path's table */
    float *table; /* float32: half the bytes of the scattered reads */
    uint8_t *ok; /* [cells + PAD] work: one row's tests (used under the GIL's lock, see add_to) */
    PyThread_type_lock lock;
} Kernel;

static void kernel_free(Kernel *k) {
    PyMem_RawFree(k->start);
    PyMem_RawFree(k->feature);
    PyMem_RawFree(k->lo);
    PyMem_RawFree(k->hi);
    PyMem_RawFree(k->nan_ok);
    PyMem_RawFree(k->scale);
    PyMem_RawFree(k->offset);
    free(k->table);
    PyMem_RawFree(k->ok);
    if (k->lock) PyThread_free_lock(k->lock);
    Py_TYPE(k)->tp_free((PyObject *)k);
}

/* A copy of a buffer of ``count`` items of ``item`` bytes (NULL and an error if not). */
static void *copied(PyObject *obj, Py_ssize_t item, Py_ssize_t count, Py_ssize_t extra,
                    const char *name) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    void *copy = NULL;
    if (view.itemsize != item || view.len != item * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes",
                     name, count, item, view.len);
    } else if ((copy = PyMem_RawCalloc((size_t)(count * item + extra), 1)) == NULL) {
        PyErr_NoMemory();
    } else {
        memcpy(copy, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return copy;
}

/* The tables, in memory aligned to 2 MiB and advised to be backed by huge pages
 * (where the kernel's transparent huge pages allow it): a row's reads are scattered
 * over the whole table, and with 4 KiB pages most would also miss the TLB. */
static float *table_copy(PyObject *obj, Py_ssize_t count) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    float *copy = NULL;
    size_t bytes = (size_t)count * sizeof(float);
    size_t rounded = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    if (view.itemsize != 8 || view.len != (Py_ssize_t)count * 8) {
        PyErr_Format(PyExc_ValueError, "table: expected %zd float64, got %zd bytes", count,
                     view.len);
    } else if (posix_memalign((void **)&copy, HUGE_PAGE, rounded ? rounded : HUGE_PAGE) != 0) {
        copy = NULL;
        PyErr_NoMemory();
    } else {
#ifdef MADV_HUGEPAGE
        (void)madvise(copy, rounded, MADV_HUGEPAGE); /* advice only: ignored where refused */
#endif
        const double *source = view.buf;
        for (Py_ssize_t i = 0; i < count; i++) copy[i] = (float)source[i];
    }
    PyBuffer_Release(&view);
    return copy;
}

static Py_ssize_t items(PyObject *obj, Py_ssize_t item, const char *name) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    Py_ssize_t n = view.itemsize == item ? view.len / item : -1;
    PyBuffer_Release(&view);
    if (n < 0) PyErr_Format(PyExc_ValueError, "%s: items must be %zd bytes", name, item);
    return n;
}

static int valid(const Kernel *k, Py_ssize_t tsize) {
    if (k->start[0] != 0 || k->start[k->paths] != k->cells) {
        PyErr_SetString(PyExc_ValueError, "path_start must run from 0 to the number of cells");
        return 0;
    }
    for (Py_ssize_t p = 0; p < k->paths; p++) {
        int32_t depth = k->start[p + 1] - k->start[p];
        if (depth < 1 || depth > MAX_DEPTH || k->offset[p] < 0
            || k->offset[p] + ((int64_t)1 << depth) > (int64_t)tsize) {
            PyErr_Format(PyExc_ValueError, "path %zd: depth %d or table offset out of range", p,
                         (int)depth);
            return 0;
        }
    }
    for (Py_ssize_t c = 0; c < k->cells; c++) {
        if (k->feature[c] < 0 || k->feature[c] >= k->features) {
            PyErr_Format(PyExc_ValueError, "cell %zd: feature out of range", c);
            return 0;
        }
    }
    return 1;
}

static PyObject *kernel_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"features", "path_start", "feature", "lo", "hi",
                            "nan_ok",   "scale",      "offset",  "table", NULL};
    Py_ssize_t features;
    PyObject *start, *feature, *lo, *hi, *nan_ok, *scale, *offset, *table;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOOOOOOOO", names, &features, &start,
                                     &feature, &lo, &hi, &nan_ok, &scale, &offset, &table)) {
        return NULL;
    }
    Kernel *k = (Kernel *)type->tp_alloc(type, 0);
    if (k == NULL) return NULL;
    k->features = features;
    Py_ssize_t paths = items(offset, 8, "offset"), cells = items(feature, 4, "feature");
    Py_ssize_t tsize = items(table, 8, "table");
    if (paths < 0 || cells < 0 || tsize < 0) goto fail;
    if (features < 1) {
        PyErr_SetString(PyExc_ValueError, "features must be >= 1");
        goto fail;
    }
    k->paths = paths;
    k->cells = cells;
    if (!(k->start = copied(start, 4, paths + 1, 0, "path_start"))
        || !(k->feature = copied(feature, 4, cells, 0, "feature"))
        || !(k->lo = copied(lo, 4, cells, 0, "lo")) || !(k->hi = copied(hi, 4, cells, 0, "hi"))
        || !(k->nan_ok = copied(nan_ok, 1, cells, 0, "nan_ok"))
        || !(k->scale = copied(scale, 8, cells, 0, "scale"))
        || !(k->offset = copied(offset, 8, paths, 0, "offset"))
        || !(k->table = table_copy(table, tsize))) {
        goto fail;
    }
    if (!valid(k, tsize)) goto fail;
    if ((k->ok = PyMem_RawCalloc((size_t)(cells + PAD), 1)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if ((k->lock = PyThread_allocate_lock()) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    return (PyObject *)k;
fail:
    Py_DECREF(k);
    return NULL;
}

static void add_row(const Kernel *k, const float *x, double *out) {
    const int32_t *start = k->start, *feature = k->feature;
    const float *lo = k->lo, *hi = k->hi;
    const uint8_t *nan_ok = k->nan_ok;
    const double *scale = k->scale;
    const float *table = k->table;
    uint8_t *ok = k->ok;
    for (Py_ssize_t c = 0; c < k->cells; c++) {
        float v = x[feature[c]];
        ok[c] = (uint8_t)(((v >= lo[c]) & (v <= hi[c])) | ((v != v) & nan_ok[c]));
    }
    uint32_t mask[BLOCK];
    for (Py_ssize_t first = 0; first < k->paths; first += BLOCK) {
        Py_ssize_t last = first + BLOCK < k->paths ? first + BLOCK : k->paths;
        for (Py_ssize_t p = first; p < last; p++) {
            int32_t depth = start[p + 1] - start[p];
#if defined(__SSE2__)
            __m128i bytes = _mm_loadu_si128((const __m128i *)(ok + start[p]));
            uint32_t a = (uint32_t)_mm_movemask_epi8(_mm_slli_epi64(bytes, 7));
            a &= ((uint32_t)1 << depth) - 1;
#else
            uint32_t a = 0;
            for (int32_t j = 0; j < depth; j++) a |= (uint32_t)ok[start[p] + j] << j;
#endif
            mask[p - first] = a;
            const float *t = table + k->offset[p];
            __builtin_prefetch(t + a);
            for (uint32_t rest = a; rest; rest &= rest - 1) {
                __builtin_prefetch(t + (a ^ (rest & (0u - rest))));
            }
        }
        for (Py_ssize_t p = first; p < last; p++) {
            uint32_t a = mask[p - first];
            const float *t = table + k->offset[p];
            for (int32_t c = start[p], j = 0; c < start[p + 1]; c++, j++) {
                uint32_t on = (a >> j) & 1;
                /* branch-free: (1/z) - 1 when satisfied, else 0 - 1 (as the numpy engine) */
                out[feature[c]] += t[a ^ (on << j)] * ((double)on * scale[c] - 1.0);
            }
        }
    }
}

/* A single-character native format (numpy's "f", "d"), optionally "<"/"=" prefixed. */
static int format_is(const Py_buffer *view, char code) {
    const char *f = view->format;
    if (f == NULL) return 0;
    if (*f == '<' || *f == '=' || *f == '@') f++;
    return f[0] == code && f[1] == '\0';
}

static PyObject *kernel_add_to(Kernel *k, PyObject *args) {
    PyObject *xo, *outo;
    if (!PyArg_ParseTuple(args, "OO", &xo, &outo)) return NULL;
    Py_buffer x, out;
    if (PyObject_GetBuffer(xo, &x, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(outo, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t rows = x.len / (Py_ssize_t)(sizeof(float) * k->features);
    if (!format_is(&x, 'f') || x.len != rows * k->features * 4) {
        PyErr_Format(PyExc_ValueError, "x: expected float32 rows of %zd features", k->features);
    } else if (!format_is(&out, 'd') || out.len != rows * (k->features + 1) * 8) {
        PyErr_Format(PyExc_ValueError, "out: expected %zd float64 rows of %zd", rows,
                     k->features + 1);
    } else {
        const float *xs = x.buf;
        double *outs = out.buf;
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(k->lock, WAIT_LOCK); /* the work bytes are the kernel's */
        for (Py_ssize_t r = 0; r < rows; r++) {
            add_row(k, xs + r * k->features, outs + r * (k->features + 1));
        }
        PyThread_release_lock(k->lock);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *kernel_cells(Kernel *k, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(k->cells);
}

static PyMethodDef kernel_methods[] = {
    {"add_to", (PyCFunction)kernel_add_to, METH_VARARGS,
     "add_to(x, out): add the attributions of x's rows (float32 [R, features], C order) into "
     "out (float64 [R, features + 1], C order)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef kernel_getset[] = {
    {"cells", (getter)kernel_cells, NULL, "(path, player) cells per row", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KernelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "server.explain._lookup.Kernel",
    .tp_basicsize = sizeof(Kernel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Kernel(features, path_start, feature, lo, hi, nan_ok, scale, offset, table): "
              "subset tables in path order, copied and checked.",
    .tp_new = kernel_new,
    .tp_dealloc = (destructor)kernel_free,
    .tp_methods = kernel_methods,
    .tp_getset = kernel_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lookup", "Compiled subset-table TreeSHAP lookup.", -1, NULL,
};

PyMODINIT_FUNC PyInit__lookup(void) {
    if (PyType_Ready(&KernelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Kernel", (PyObject *)&KernelType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
